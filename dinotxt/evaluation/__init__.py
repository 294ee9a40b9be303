from .zeroshot import evaluate_zeroshot

__all__ = ["evaluate_zeroshot"]
