"""attnkit.viz.plots: pooling arithmetic, and every figure written as a non-blank PNG/SVG."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnkit

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'attnkit[viz]')")

from attnkit.viz import plots


def _maps(layers: int, heads: int, length: int) -> torch.Tensor:
    """Real attention probabilities ``(layers, heads, L, L)`` from attnkit."""
    q = torch.randn(1, layers * heads, length, 8)
    k = torch.randn(1, layers * heads, length, 8)
    return attnkit.attention_weights(q, k)[0].reshape(layers, heads, length, length)  # (layers, H, L, L)


def _png_pixels(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _assert_real_png(path, *, min_bytes: int = 2000) -> None:
    assert path.stat().st_size > min_bytes, f"{path} is only {path.stat().st_size} bytes"
    pixels = _png_pixels(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    # Non-uniform: many distinct colours, and not one colour covering almost everything.
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) > 20, f"{path} has only {len(colours)} colours"
    assert counts.max() < 0.95 * counts.sum(), f"{path} is almost one colour"


def test_tile_edges_cover_every_token_once():
    edges = plots.tile_edges(1000, 64)
    assert edges[0] == 0 and edges[-1] == 1000 and len(edges) == 65
    assert np.all(np.diff(edges) >= 15)
    assert len(plots.tile_edges(10, 64)) == 11  # never more tiles than tokens
    with pytest.raises(ValueError, match="length"):
        plots.tile_edges(0, 4)


def test_pool_map_is_the_tile_mean():
    w = torch.rand(2, 37, 37, dtype=torch.float64)
    edges = plots.tile_edges(37, 5)
    pooled = plots.pool_map(w, edges)
    assert pooled.shape == (2, 5, 5)
    for s in range(5):
        for t in range(5):
            block = w[:, edges[s] : edges[s + 1], edges[t] : edges[t + 1]]
            np.testing.assert_allclose(pooled[:, s, t], block.mean(dim=(-1, -2)).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="tile edges"):
        plots.pool_map(w, plots.tile_edges(36, 5))


@pytest.mark.parametrize("length, tiles", [(37, 5), (100, 7), (250, 96), (10, 64)])
def test_pooling_is_the_statistics_convention(length, tiles):
    """One convention: tiles are the statistics' pool edges, pooled maps their mean weight per tile."""
    q, k = torch.randn(1, 2, length, 8, dtype=torch.float64), torch.randn(1, 2, length, 8, dtype=torch.float64)
    st = attnkit.attention_stats(q, k, k, topk=2, pool=tiles)
    edges = plots.tile_edges(length, tiles)
    np.testing.assert_array_equal(edges, st.pool_edges()[0].numpy())
    pooled = plots.pool_map(attnkit.attention_weights(q, k)[0], edges)  # (H, P, P)
    np.testing.assert_allclose(pooled, st.pooled_density()[0].numpy(), rtol=1e-10, atol=1e-12)


def test_heatmap_with_token_labels(tmp_path):
    maps = _maps(1, 1, 24)
    tokens = [f"tok{i}" for i in range(24)]
    fig = plots.head_heatmap(maps[0, 0], tokens, title="layer 0 head 0")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == tokens
    _assert_real_png(plots.save(fig, tmp_path / "head.png"))
    svg = plots.save(fig, tmp_path / "head.svg")
    assert svg.read_text().lstrip().startswith("<?xml") and "tok23" in svg.read_text()


def test_long_heatmap_is_pooled_with_ranges_on_the_axes(tmp_path):
    maps = _maps(1, 1, 300)
    fig = plots.head_heatmap(maps[0, 0], [f"t{i}" for i in range(300)], pool_above=256, tiles=30)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (30, 30)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "0–9" and labels[-1] == "290–299"
    _assert_real_png(plots.save(fig, tmp_path / "pooled.png"))


def test_pooled_input_with_edges():
    edges = plots.tile_edges(100, 10)
    pooled = plots.pool_map(_maps(1, 1, 100)[0, 0], edges)
    fig = plots.head_heatmap(pooled, edges=edges)
    assert fig.axes[0].images[0].get_array().shape == (10, 10)
    with pytest.raises(ValueError, match="tiles"):
        plots.head_heatmap(pooled, edges=plots.tile_edges(100, 9))


def test_grid_scatter_and_strip(tmp_path):
    maps = _maps(3, 4, 20)
    fig = plots.head_grid(maps, title="all heads", layer_names=["a", "b", "c"])
    mosaic = fig.axes[0].images[0].get_array()
    assert mosaic.shape == (3 * 20 + 2 * 1, 4 * 20 + 3 * 1)  # 20-pixel tiles with 1-pixel gaps
    np.testing.assert_allclose(mosaic[21:41, 42:62].max(), 1.0)  # layer 1, head 2 scaled to its maximum
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a", "b", "c"]
    _assert_real_png(plots.save(fig, tmp_path / "grid.png"))
    entropy = torch.rand(3, 4) * 3
    distance = torch.rand(3, 4) * 10
    fig = plots.entropy_distance(entropy, distance)
    offsets = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(np.asarray(offsets)[:, 0], distance.numpy().ravel(), rtol=1e-6)
    _assert_real_png(plots.save(fig, tmp_path / "heads.png"))
    with pytest.raises(ValueError, match="must match"):
        plots.entropy_distance(entropy, distance[:2])
    tokens = [f"word{i}" for i in range(40)]
    fig = plots.token_strip(tokens, torch.rand(40), title="rollout")
    _assert_real_png(plots.save(fig, tmp_path / "strip.png"))
    with pytest.raises(ValueError, match="tokens"):
        plots.token_strip(tokens, torch.rand(39))
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        plots.save(fig, tmp_path / "strip.jpg")
