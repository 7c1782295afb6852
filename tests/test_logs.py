"""The one logging style: what a command announces is said once per process world, on stderr."""

from types import SimpleNamespace

from concept_erase import runtime
from concept_erase.logs import announce, rough_duration


def test_announce_speaks_on_the_main_process_only(monkeypatch, capsys):
    announce("defaults for minisd: --guidance-scale 5")
    assert capsys.readouterr().err == "concept-erase: defaults for minisd: --guidance-scale 5\n"
    monkeypatch.setattr(runtime, "process_state", lambda: SimpleNamespace(is_main_process=False))
    announce("said by rank 1")
    assert capsys.readouterr().err == ""


def test_rough_duration():
    assert [rough_duration(s) for s in (40, 180, 9000)] == ["40 s", "3 min", "2.5 h"]


def test_no_progress_hides_the_libraries_bars_too():
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    from concept_erase.logs import hide_library_bars

    try:
        hide_library_bars()
        assert not diffusers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
