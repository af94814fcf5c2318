"""The monitor's `transformers.TrainerCallback` inside a tiny `transformers.Trainer` run (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

from attnkit.inspect import Monitor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install attnkit[hf])")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, length: int, vocab: int):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_callback_in_a_tiny_trainer_run(tmp_path):
    cfg = transformers.GPT2Config(
        vocab_size=61, n_embd=32, n_head=4, n_layer=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg)
    model.set_attn_implementation("sdpa")
    monitor = Monitor(model, every=2, logdir=tmp_path / "monitor", tensorboard=False, near=2, far=8)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-3, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(24, 20, 61), callbacks=[monitor.trainer_callback()]
    )
    trainer.train()
    assert [s["step"] for s in monitor.steps] == [0, 2, 4]
    assert model.config._attn_implementation == "sdpa"  # switched to "attnkit" on monitored steps only
    for s in monitor.steps:
        assert (s["batch"], s["length"]) == (2, 20)  # the first micro-batch's figures
        assert s["attention_forward_ms"] > 0 and s["attention_backward_ms"] > 0
    layers = sorted({r["layer"] for r in monitor.history})
    assert layers == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert len(monitor.history) == 3 * 2 * 4
    for r in monitor.history:
        assert 0 <= r["near_share"] <= 1 + 1e-6 and 0 <= r["far_share"] <= 1 + 1e-6
        assert r["near_share"] + r["far_share"] <= 1 + 1e-6  # the bands do not overlap
    lines = (tmp_path / "monitor" / "heads.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 * 2 * 4
