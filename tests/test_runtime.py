"""The one home of the device, the accelerate process and the cache folder."""

import pytest
import torch

from concept_erase.errors import ConceptEraseError
from concept_erase.runtime import cache_root, process_state, resident_memory, resolve_device


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPT_ERASE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("CONCEPT_ERASE_CACHE")
    assert cache_root().parts[-2:] == (".cache", "concept-erase")


def test_devices():
    assert resolve_device(None) is None
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConceptEraseError, match="unknown device 'toaster'"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ConceptEraseError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_single_process_is_the_main_one():
    state = process_state()
    assert state.is_main_process and state.num_processes == 1


def test_resident_memory_follows_what_the_process_touches():
    before = resident_memory()
    block = torch.ones(64 * 2**20)  # 256 MiB, every page written
    grown = resident_memory() - before
    assert 200 * 2**20 < grown < 320 * 2**20
    assert resident_memory(peak=True) >= before + grown - 2**20  # getrusage may lag by a few pages
    del block
