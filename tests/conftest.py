import os

import pytest
import torch

from dinotxt.log import setup_console

# the progress messages the command line shows (tests read them from stdout, in process too)
setup_console()

# DINOTXT_TEST_THREADS=1 runs the suite single-threaded: reductions split differently over threads,
# so a tolerance must hold for both
torch.set_num_threads(int(os.environ.get("DINOTXT_TEST_THREADS", min(2, os.cpu_count() or 1))))

# reduced sizes so every registered architecture builds in well under a second
TINY_BACKBONE = {"img_size": 56, "kwargs": {"depth": 1, "embed_dim": 96, "num_heads": 2}}
TINY_TEXT = {"width": 64, "depth": 2, "heads": 2, "vocab_size": 100, "context_length": 16}


@pytest.fixture
def tiny_model():
    import dinotxt

    torch.manual_seed(0)
    return dinotxt.create_model("dinotxt_demo", backbone=TINY_BACKBONE, text=TINY_TEXT,
                                vision_head={"num_blocks": 2, "drop_path": 0.0})
