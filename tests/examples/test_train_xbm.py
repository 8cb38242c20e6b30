"""examples/train_xbm.py (CrossBatchMemory, docs/semantics.md §2.7): a few steps run, fill the
memory and print the held-out recall."""

import math

from scripts import load_script


def test_example_train_xbm_runs_a_few_steps(capsys):
    mod = load_script("examples/train_xbm.py")
    out = mod.main(["--steps", "3", "--memory-size", "100", "--semantics", "pml"])
    assert out["memory_filled"] == 100  # 3 batches of 8 x 8 = 192 rows into a ring of 100
    assert math.isfinite(out["last_loss"]) and out["last_loss"] > 0
    assert "recall@1 on held-out samples" in capsys.readouterr().out
