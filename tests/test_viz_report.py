"""attnkit.viz.report without a browser: the data format, escaping, pooling and size."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import attnkit
from attnkit.viz.report import ReportData, render_report, topk_links, write_report

HOSTILE = ["<img src=x onerror=alert(1)>", "</script><script>window.__pwned=1</script>", "a&b", "\u2028x"]


def _maps(layers: int, heads: int, length: int) -> torch.Tensor:
    q = torch.randn(1, layers * heads, length, 8)
    k = torch.randn(1, layers * heads, length, 8)
    return attnkit.attention_weights(q, k)[0].reshape(layers, heads, length, length)  # (layers, H, L, L)


def _embedded(page: str) -> dict:
    body = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(body)


def test_topk_links_match_torch_topk():
    maps = _maps(2, 3, 30)
    index, weight = topk_links(maps, 4)
    ref = torch.topk(maps, 4, dim=-1)
    np.testing.assert_allclose(weight, ref.values.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(index, ref.indices.numpy())


def test_round_trip_within_quantisation():
    maps = _maps(2, 3, 25)
    data = ReportData.from_maps([f"t{i}" for i in range(25)], maps, topk=3, saliency={"rollout": torch.rand(25)})
    back = ReportData.from_dict(json.loads(json.dumps(data.to_dict())))
    assert back.tokens == data.tokens and back.edges is None
    # Maps are stored as round(255 * sqrt(w / head max)): the error is at most about one step of that scale.
    peak = maps.amax(dim=(-1, -2), keepdim=True).numpy()
    assert np.all(np.abs(np.sqrt(back.maps / peak) - np.sqrt(maps.numpy() / peak)) <= 0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(back.topk_index, data.topk_index)
    np.testing.assert_allclose(back.topk_weight, data.topk_weight, atol=1 / 65535)
    np.testing.assert_allclose(back.saliency["rollout"], data.saliency["rollout"], atol=1e-5)


def test_long_inputs_are_pooled_with_a_note():
    maps = _maps(1, 2, 120)
    data = ReportData.from_maps([f"t{i}" for i in range(120)], maps, map_budget=100, tiles=12, topk=2)
    assert data.maps.shape == (1, 2, 12, 12) and data.edges.tolist()[-1] == 120
    # Pooled rows keep their mass: sum over key tiles of mean weight * tile size = 1 per query.
    sizes = np.diff(data.edges)
    np.testing.assert_allclose((data.maps * sizes).sum(-1), 1.0, rtol=1e-5)
    assert any("map budget" in note for note in data.notes)


def test_from_stats_uses_what_the_statistics_carry():
    """Links are the statistics' own top-k; long inputs take their pooled maps; short ones the full maps."""
    L = 40
    q, k = torch.randn(1, 3, L, 8), torch.randn(1, 3, L, 8)
    maps = attnkit.attention_weights(q, k)[0]  # (H, L, L)
    stats = [attnkit.attention_stats(q, k, k, topk=3, pool=8) for _ in range(2)]  # two identical "layers"
    tokens = [f"t{i}" for i in range(L)]
    full = ReportData.from_stats(tokens, stats, maps=[maps, maps], skip={0}, map_budget=64)
    assert full.edges is None and full.maps.shape == (2, 3, L, L) and not full.notes
    np.testing.assert_array_equal(full.topk_index[0], stats[0].topk_index[0].numpy())
    np.testing.assert_allclose(full.topk_weight[0], stats[0].topk_weight[0].numpy())
    index, weight = topk_links(maps[None], 3)  # what from_maps derives agrees with the statistics
    np.testing.assert_array_equal(full.topk_index[:1], index)
    np.testing.assert_allclose(full.topk_weight[:1], weight, rtol=1e-5)
    np.testing.assert_allclose(full.entropy[0], stats[0].entropy[0, :, 1:].mean(-1).numpy(), rtol=1e-6)
    pooled = ReportData.from_stats(tokens, stats, maps=[maps, maps], map_budget=32, notes=["first"])
    np.testing.assert_array_equal(pooled.edges, stats[0].pool_edges()[0].numpy())
    np.testing.assert_allclose(pooled.maps[1], stats[1].pooled_density()[0].numpy(), rtol=1e-6)
    assert pooled.notes[0] == "first" and "map budget of 32" in pooled.notes[1]
    by_maps = ReportData.from_maps(tokens, torch.stack([maps, maps]), map_budget=32, tiles=8, topk=3)
    np.testing.assert_array_equal(by_maps.edges, pooled.edges)
    np.testing.assert_allclose(by_maps.maps, pooled.maps, rtol=1e-5, atol=1e-7)


def test_validation_names_the_field():
    maps = _maps(1, 1, 5)
    tokens = list("abcde")
    index, weight = topk_links(maps, 2)
    with pytest.raises(ValueError, match="full maps"):
        ReportData(tokens[:4], maps, index[:, :, :4], weight[:, :, :4])
    with pytest.raises(ValueError, match="topk_index"):
        ReportData(tokens, maps, index[..., :1], weight)
    with pytest.raises(ValueError, match="spacing"):
        ReportData(tokens, maps, index, weight, spacing=["", " ", "\t", " ", " "])
    with pytest.raises(ValueError, match="saliency"):
        ReportData(tokens, maps, index, weight, saliency={"rollout": np.ones(4)})
    with pytest.raises(ValueError, match="entropy"):
        ReportData(tokens, maps, index, weight, entropy=np.ones((2, 1)))


def test_input_text_cannot_escape_its_script_block():
    tokens = [*HOSTILE, "ok"]
    data = ReportData.from_maps(tokens, _maps(1, 1, len(tokens)), title="<b>title</b>", notes=["</script>"])
    page = render_report(data)
    for raw in [*HOSTILE[:2], "<b>title</b>"]:
        assert raw not in page
    assert page.count("</script>") == 2  # the data block's and the code's own
    assert "&lt;b&gt;title&lt;/b&gt;" in page
    assert _embedded(page)["tokens"] == tokens  # and the JSON still decodes to the exact text
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src &#x27;none&#x27;" in policy and "unsafe-inline" not in policy


def test_4k_token_report_stays_under_10_mb(tmp_path):
    # What a 4096-token input through a 6-layer, 12-head model (MiniLM's shape) produces: pooled maps + top-k.
    N, H, L, P, k = 6, 12, 4096, 96, 5
    rng = np.random.default_rng(0)
    pooled = rng.dirichlet(np.ones(P), size=(N, H, P)).astype(np.float32) / (L / P)
    index = rng.integers(0, L, size=(N, H, L, k))
    weight = np.sort(rng.dirichlet(np.ones(64), size=(N, H, L))[..., :k], axis=-1)[..., ::-1]
    tokens = [f"tok{i % 977}" for i in range(L)]
    edges = np.round(np.linspace(0, L, P + 1)).astype(int)
    data = ReportData(tokens, pooled, index, weight, edges=edges, saliency={"rollout": rng.random(L)})
    path = write_report(data, tmp_path / "long.html")
    size = path.stat().st_size
    assert size < 10 * 2**20, f"report is {size / 2**20:.1f} MiB"


def test_sections_and_their_flow_travel_through_the_report_data():
    L, N, H = 6, 2, 3
    maps = np.full((N, H, L, L), 1 / L, dtype=np.float32)
    index = np.zeros((N, H, L, 2), dtype=np.int64)
    weight = np.full((N, H, L, 2), 0.5, dtype=np.float32)
    sections = [
        {"label": "1", "title": "Definitions", "start": 0, "end": 2},
        {"label": "2", "title": "Use", "start": 2, "end": 6},
    ]
    flow = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32) * np.ones((N, H, 1, 1), dtype=np.float32)
    data = ReportData(["a"] * L, maps, index, weight, sections=sections, section_flow=flow)
    back = ReportData.from_dict(json.loads(json.dumps(data.to_dict())))
    assert back.sections == sections
    # Stored like the maps but with a peak per row, round(255 * sqrt(f / row peak)): within half a step on
    # that scale, so within row peak / 255 in value.
    peak = flow.max(axis=-1, keepdims=True)
    assert np.all(np.abs(np.sqrt(back.section_flow / peak) - np.sqrt(flow / peak)) <= 0.5 / 255 + 1e-6)
    np.testing.assert_allclose(back.section_flow, flow, atol=0.75 / 255)
    with pytest.raises(ValueError, match="covering"):
        ReportData(["a"] * L, maps, index, weight, sections=sections[:1], section_flow=flow[..., :1, :1])
    with pytest.raises(ValueError, match="section_flow must be"):
        ReportData(["a"] * L, maps, index, weight, sections=sections, section_flow=flow[0])


def _sectioned(S: int, N: int, H: int, *, causal: bool = False, seed: int = 0, **fields) -> ReportData:
    """A report over ``4 S`` tokens in ``S`` sections of 4 with random (incompressible) flows ``(N, H, S, S)``."""
    rng = np.random.default_rng(seed)
    flow = rng.random((N, H, S, S), dtype=np.float32)
    if causal:
        flow = np.tril(flow)
    flow /= flow.sum(-1, keepdims=True)
    L = 4 * S
    sections = [{"label": f"{i + 1}", "title": f"Section {i + 1}", "start": 4 * i, "end": 4 * i + 4} for i in range(S)]
    edges = np.round(np.linspace(0, L, 9)).astype(int)
    maps = np.full((N, H, 8, 8), 1 / L, dtype=np.float32)
    index = rng.integers(0, L, size=(N, H, L, 2))
    weight = np.full((N, H, L, 2), 0.5, dtype=np.float32)
    return ReportData(["w"] * L, maps, index, weight, edges=edges, sections=sections, section_flow=flow, **fields)


def _close_on_sqrt_scale(got: np.ndarray, want: np.ndarray) -> bool:
    """Within half a step of the section flow's code, round(255 * sqrt(f / peak of its row))."""
    peak = want.max(axis=-1, keepdims=True)
    return bool(np.all(np.abs(np.sqrt(got / peak) - np.sqrt(want / peak)) <= 0.5 / 255 + 1e-6))


@pytest.mark.parametrize(("S", "N", "H"), [(217, 24, 32), (500, 24, 4)])
def test_large_section_flow_keeps_the_report_under_15_mb(tmp_path, S, N, H):
    """217 sections (the long contract) through 24 layers x 32 heads is 36M values; 500 sections of random,
    incompressible flow is the worst case per value. The report stays under 15 MB: it keeps the mean of all
    layers, the head average of as many layers as fit, single heads for as many as fit after those, and says so."""
    data = _sectioned(S, N, H)
    path = write_report(data, tmp_path / "sections.html")
    assert path.stat().st_size < 15 * 10**6, f"report is {path.stat().st_size / 10**6:.1f} MB"
    embedded = _embedded(path.read_text(encoding="utf-8"))
    block = embedded["section_flow"]
    means = [l for l in range(N) if block["layers"][l] is not None]
    heads = [l for l in range(N) if block["heads"][l] is not None]
    # Layers are taken spread over depth, the first and the last before the rest.
    assert {0, N - 1} <= set(means) and heads[:1] in ([], [0]) and (len(heads) < 2 or N - 1 in heads)
    assert set(heads) <= set(means)
    assert len(heads) < N and "size budget" in block["note"] and not block["causal"]
    back = ReportData.from_dict(embedded)
    flow = data.section_flow
    assert _close_on_sqrt_scale(back.section_flow[heads], flow[heads])
    # A layer without its single heads repeats its exact head average (or the mean of all), quantised, for every head.
    averaged = [l for l in means if l not in heads]
    assert _close_on_sqrt_scale(back.section_flow[averaged, 0], flow[averaged].mean(axis=1))
    np.testing.assert_array_equal(back.section_flow[averaged, 0], back.section_flow[averaged, -1])
    rest = [l for l in range(N) if l not in means]
    if rest:
        assert _close_on_sqrt_scale(back.section_flow[rest[0], 0], flow.mean(axis=(0, 1)))


def test_section_flow_takes_only_what_the_rest_of_the_report_leaves(monkeypatch):
    import attnkit.viz.report as report

    data = _sectioned(40, 3, 2, causal=True)
    full = data.to_dict()["section_flow"]
    assert full["note"] is None and full["causal"] and all(full["heads"])
    monkeypatch.setattr(report, "REPORT_BUDGET", 1)  # nothing left: only the mean over all layers and heads
    block = data.to_dict()["section_flow"]
    assert block["layers"] == [None] * 3 and block["heads"] == [None] * 3 and "no layer" in block["note"]
    back = ReportData.from_dict(json.loads(json.dumps(data.to_dict())))
    assert _close_on_sqrt_scale(back.section_flow[1, 1], data.section_flow.mean(axis=(0, 1)))
    assert np.all(np.triu(back.section_flow, 1) == 0)  # a causal flow stays causal through the encoding


def test_section_titles_cannot_escape_their_script_block():
    L = 6
    sections = [
        {"label": HOSTILE[1], "title": HOSTILE[0], "start": 0, "end": 3},
        {"label": "2", "title": HOSTILE[2] + HOSTILE[3], "start": 3, "end": 6},
    ]
    flow = np.full((1, 1, 2, 2), 0.5, dtype=np.float32)
    data = ReportData.from_maps(["a"] * L, _maps(1, 1, L), sections=sections, section_flow=flow)
    page = render_report(data)
    for raw in HOSTILE[:2]:
        assert raw not in page
    assert page.count("</script>") == 2
    assert _embedded(page)["sections"] == sections
