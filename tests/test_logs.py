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
