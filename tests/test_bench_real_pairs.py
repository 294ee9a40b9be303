"""The real-pairs benchmark's pieces (bench/real_pairs.py) on tiny synthetic data: the bag-of-words LiT
baseline learns a toy problem, the arms parse, the table formats; not the benchmark itself (minutes)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import real_pairs as rp  # noqa: E402


def test_bag_of_words_counts_words_of_the_training_vocabulary():
    bow = rp.BagOfWords(["A red fox.", "red apple", "Blue car"])
    assert len(bow.index) == 6 and len(bow) == 7 and list(bow.index)[0] == "red"  # most frequent first
    x = bow(["red red fox", "unknown words", ""])
    assert x.shape == (3, 7)
    assert x[0, bow.index["red"]] == 2 and x[0, bow.index["fox"]] == 1 and x[0].sum() == 3
    # words outside the vocabulary count in the last column: no caption embeds to zero (a tie with every image)
    assert x[1, bow.unk] == 2 and x[1].sum() == 2 and x[2, bow.unk] == 1 and x[2].sum() == 1
    assert rp.BagOfWords(["a a b"], min_count=2).index == {"a": 0}


def _toy(n_per_class=24, classes=6, dim=32, seed=0):
    """Images: noisy class prototypes; captions: the class word plus a shared filler word."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, dim, generator=g)
    names = ["fox", "car", "tree", "boat", "lamp", "shoe"][:classes]
    feats, caps, labels = [], [], []
    for c in range(classes):
        for i in range(n_per_class):
            feats.append(protos[c] + 0.3 * torch.randn(dim, generator=g))
            caps.append(f"a {names[c]} picture" if i % 2 else names[c])
            labels.append(c)
    return torch.stack(feats), caps, torch.tensor(labels), names


def test_linear_lit_learns_the_toy_problem_well_above_chance():
    feats, caps, labels, names = _toy()
    bow = rp.BagOfWords(caps)
    counts = bow(caps)
    val = torch.arange(len(caps)) % 6 == 0
    model, info = rp.train_linear_lit(feats[~val], counts[~val], val=(feats[val], counts[val]), dim=16, steps=60,
                                      lr=1e-2, eval_every=5)
    assert info["final_loss"] < info["first_loss"] and 1 <= info["best_step"] <= 60
    # zero-shot through dinotxt's own classifier code: the BoW is the tokenizer, LinearLit the text encoder
    from dinotxt.inference.classifier import zero_shot_classifier

    with torch.no_grad():
        classifier = zero_shot_classifier(model, bow, names, ["a {} picture", "{}"])
        pred = (model.encode_image(feats[val]) @ classifier.t()).argmax(1)
    assert (pred == labels[val]).float().mean() > 0.8  # chance 1/6
    # retrieval R@1 of the validation pairs: captions repeat within a class, so 1/6 of the images is the
    # best a perfect model reaches text->image; far above the 1/len chance
    assert rp.recall_at_1(model, feats[val], counts[val]) > 3 / int(val.sum())


def test_arms_parse_named_custom_and_unknown():
    arms = rp.parse_arms("bow,lit,lr2e3=optim.lr=2e-3;optim.warmup_steps=10")
    assert [a.name for a in arms] == ["bow", "lit", "lr2e3"]
    assert arms[0].bow and arms[1].overrides == rp.SCRATCH and rp.parse_arms("recipe")[0].overrides == []
    assert rp.parse_arms("mf4_views4")[0].overrides == rp.MINILM_F4 + ["cache.views=4"]  # one sweep row by name
    assert arms[2].overrides == ["optim.lr=2e-3", "optim.warmup_steps=10"]
    assert [a.name for a in rp.parse_arms("sweep")] == list(rp.SWEEP)
    with pytest.raises(SystemExit, match="unknown arm"):
        rp.parse_arms("nope")


def test_every_arm_composes_with_the_recipe():
    """Every named and sweep arm is a valid config on top of recipes/own_pairs_cpu.yaml (an unknown key is an error)."""
    from dinotxt.config import load_train_config

    dinotxt_arms = [a for a, arm in rp.ARMS.items() if not arm.bow and arm.kind == "dinotxt"]
    for arm in rp.parse_arms(",".join(dinotxt_arms) + ",sweep"):
        cfg = load_train_config(str(rp.RECIPE), ["data.train=/tmp/none", *arm.overrides])
        assert cfg.model.arch == rp.ARCH
    assert "cache_dinotxt_effnet_lite0_pooled_v2" in rp.cache_path(Path("/w"), rp.RECIPE, [])


def test_open_clip_lit_embeds_clip_bpe_captions_into_the_image_width():
    """The open_clip baseline: CLIP BPE ids at context 16, open_clip's text transformer into the frozen features'
    width (the locked image tower: the image embedding is the feature itself), usable by the zero-shot classifier."""
    from dinotxt.inference.classifier import zero_shot_classifier

    tok = rp.OpenClipTokenizer()
    ids = tok(["A pelican.", "a very long caption " * 10])
    assert ids.shape == (2, 16) and ids[0, 0] == 49406 and int(ids[1, -1]) == 49407  # truncated, still ends in EOT
    torch.manual_seed(0)
    model = rp.OpenClipLit(image_dim=40)
    assert model.encode_text(ids).shape == (2, 40)
    feats = torch.randn(3, 40)
    assert torch.allclose(model.encode_image(feats), torch.nn.functional.normalize(feats, dim=-1))
    assert zero_shot_classifier(model, tok, ["bird", "car"], ["a {}"]).shape == (2, 40)
    assert rp.parse_arms("openclip")[0].kind == "openclip"


def test_table_formats_rows_chance_notes_and_failures():
    zs = {"top1": 0.25, "top5": 0.6, "chance_top1": 1 / 23, "num_classes": 23, "num_images": 452}
    ret = {"image_to_text_R@1": 0.1, "text_to_image_R@1": 0.125, "chance_R@1": 1 / 742, "num_images": 742,
           "num_texts": 742}
    rows = [{"arm": "bow", "what": "baseline", "zeroshot": zs, "retrieval": ret, "steps": 120, "train_seconds": 12.3,
             "wall_seconds": 12.3, "note": "vocab 10 words"},
            {"arm": "x", "what": "broken", "error": "RuntimeError: boom"}]
    table = rp.format_table(rows, "Some CPU, 2 cores", "header line")
    lines = table.splitlines()
    assert lines[0] == "header line" and lines[1] == "CPU: Some CPU, 2 cores"
    assert "| bow | baseline | 25.0% | 60.0% | 10.0% | 12.5% | - | 120 | 12 | 12 |" in table
    assert "| x | broken | failed: RuntimeError: boom |" in table
    assert "chance: zero-shot top-1 4.3% (23 classes, 452 images); R@1 0.13%" in table
    assert "- bow: vocab 10 words" in table


def test_cpu_name_names_the_cpu():
    name = rp.cpu_name()
    assert "cores" in name and not name.startswith(",")
