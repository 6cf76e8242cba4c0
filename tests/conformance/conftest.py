"""Fixtures of the conformance suite: one case per family and decoder (tests/conformance/cases.py),
its checkpoint, a bundle with random routers at every default candidate layer (1 and 2 for a
4-layer decoder) in either KV flavour, and images."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.artefacts import export, shared
from tests.conformance.cases import CASES, Case
from tests.conftest import random_routers, tiny_checkpoint

QUESTION = "what color is the circle on the left?"


def pytest_generate_tests(metafunc):
    """Every test that takes `case` runs for each case (a subset: the test's `family_cases`
    attribute, else its module's FAMILY_CASES), and a
    test that takes `kv` for each KV flavour the case's checkpoint can be exported in."""
    if "case" not in metafunc.fixturenames:
        return
    cases = getattr(metafunc.function, "family_cases", None) or getattr(
        metafunc.module, "FAMILY_CASES", CASES
    )
    # each module takes the cases in another order, so that workers on different modules build
    # different artefacts at a time instead of waiting for one another's
    turn = zlib.crc32(metafunc.module.__name__.encode()) % len(cases)
    cases = (*cases[turn:], *cases[:turn])
    if "kv" in metafunc.fixturenames:
        pairs = [(c, kv) for c in cases for kv in c.kv_flavours]
        metafunc.parametrize(("case", "kv"), pairs, ids=[f"{c.id}-{kv}" for c, kv in pairs], scope="module")
    else:
        metafunc.parametrize("case", cases, ids=[c.id for c in cases], scope="module")


@pytest.fixture(scope="module")
def checkpoint(case: Case) -> Path:
    return tiny_checkpoint(case.family, case.variant, case.seed)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from export.loading import load_checkpoint

    return load_checkpoint(str(checkpoint))


@pytest.fixture(scope="module")
def routers(loaded) -> Path:
    dims = loaded.adapter.dims  # a router at every default candidate: layers 1..L-2
    return random_routers(dims.hidden, tuple(range(1, dims.num_layers - 1)))


def case_bundle(case: Case, checkpoint: Path, routers: Path | None, kv: str | None = None, **options) -> Path:
    """The case's bundle with random routers at its candidate layers (None: without), in KV flavour
    `kv` (None: the one the exporter chooses for it, the first of the case's flavours, so that
    asking for it by name is the same artefact) and `options` (a precision, exit layers)."""
    kv = kv or case.kv_flavours[0]
    suffix = "".join(f"-{k}={v}" for k, v in sorted(options.items())) + ("" if routers else "-no-routers")
    return shared(
        f"bundle-{case.id}-{kv}{suffix}",
        lambda out: export(checkpoint, out, routers=routers, kv=kv, **options),
    )


@pytest.fixture(scope="module")
def bundle(case, checkpoint, routers) -> Path:
    return case_bundle(case, checkpoint, routers)


@pytest.fixture(scope="module")
def images(case: Case) -> dict[str, Image.Image]:
    rng = np.random.RandomState(case.seed + 3)
    return {
        name: Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
        for name, (h, w) in case.images.items()
    }


@pytest.fixture(scope="module")
def image_files(images, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, image in images.items():
        paths[name] = root / f"{name}.png"
        image.save(paths[name])
    return paths
