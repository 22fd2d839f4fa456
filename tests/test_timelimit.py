"""``--time-limit`` over the whole run (:mod:`dtr_compile.timelimit`): the split of the limit
between the stages that can stop, on a fake clock, and the heal's share when the search would
take all the time. A compile's report of the shares: tests/test_heal_pipeline.py; a distillation
cut short: tests/test_distill.py."""

from __future__ import annotations

import pytest

from dtr_compile.search.schedule import schedule
from dtr_compile.timelimit import EXPORT_RESERVE, RunClock, site_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_split_of_the_limit_between_the_stoppable_stages() -> None:
    """Limit 100 s, reserve 15 s. Load takes 10 s: the distillation may take 40 s (40 % of the
    limit). It takes them: 35 s are left after the reserve; the search gets 2/3 with --heal
    (23.33 s), the heal what is left after it (11.67 s, 1/3 of 35), and without --heal the
    search all 35 s."""
    t = FakeClock()
    clock = RunClock(100.0, t)
    assert clock.reserve_s == pytest.approx(100.0 * EXPORT_RESERVE) == pytest.approx(15.0)
    t.now = 10.0
    assert clock.share("distill") == pytest.approx(40.0)
    t.now = 50.0
    clock.used("distill", 40.0, stopped=True)
    assert clock.share("search") == pytest.approx(35.0)
    assert clock.share("search", heal=True) == pytest.approx(35.0 * 2 / 3)
    t.now = 50.0 + 35.0 * 2 / 3
    clock.used("search", 35.0 * 2 / 3, stopped=True)
    assert clock.share("heal") == pytest.approx(35.0 / 3)
    d = clock.to_dict()
    assert d["limit_s"] == 100.0 and d["export_reserve_s"] == pytest.approx(15.0)
    assert d["stages"]["distill"] == {"started_s": 10.0, "share_s": 40.0, "used_s": 40.0,
                                      "stopped_by_limit": True}
    assert d["stages"]["search"]["started_s"] == 50.0
    assert d["stages"]["heal"]["used_s"] is None
    # a long load leaves the distillation less than its 40 %; past the reserve, nothing
    t2 = FakeClock()
    late = RunClock(100.0, t2)
    t2.now = 80.0
    assert late.share("distill") == pytest.approx(5.0)
    t2.now = 90.0
    assert late.share("search") == 0.0 and late.share("heal") == 0.0
    with pytest.raises(ValueError, match="unknown stoppable stage"):
        late.share("export")
    # no limit: no shares, nothing reported
    free = RunClock(None, t2)
    assert free.share("distill") is None and free.share("search", heal=True) is None
    assert free.stages == {}


def test_the_limit_counts_the_time_spent_before_the_search() -> None:
    """The clock starts with the run: 60 s of load and baseline (stages that cannot stop) leave
    the search 100 − 60 − 15 = 25 s, not the whole 100 s it had when the limit bounded only
    the search."""
    t = FakeClock()
    clock = RunClock(100.0, t)
    t.now = 60.0
    assert clock.share("search") == pytest.approx(25.0)
    assert clock.stages["search"]["started_s"] == 60.0


def test_site_seconds_share_the_distillation_time_over_workers() -> None:
    assert site_seconds(60.0, waiting=6, workers=1) == pytest.approx(10.0)
    assert site_seconds(60.0, waiting=6, workers=2) == pytest.approx(20.0)
    assert site_seconds(60.0, waiting=1, workers=4) == pytest.approx(60.0)  # the last one: all
    assert site_seconds(-1.0, waiting=3, workers=1) == 0.0


def test_heal_keeps_its_share_when_the_search_would_take_all_the_time() -> None:
    """A search of 20 sites, 10 s an evaluation, would take 200 s; the limit is 100 s with
    --heal. The search stops within its 2/3 of the 85 s after the reserve (one evaluation of
    overrun at most), and the heal still gets at least a third of those 85 s less that
    evaluation; before, the search could take the whole limit and leave the heal nothing."""
    t = FakeClock()
    clock = RunClock(100.0, t)
    share = clock.share("search", heal=True)
    assert share == pytest.approx(85.0 * 2 / 3)

    def evaluate(linear: tuple[str, ...]) -> float:
        t.now += 10.0
        return 1.0

    res = schedule([f"site{i}" for i in range(20)], evaluate, baseline=1.0, threshold=0.5,
                   time_limit_s=share, clock=t)
    assert res.stop_reason.startswith("reached --time-limit")
    assert len(res.evaluations) == 6  # started at 0 … 50 s; not at 60 s
    heal = clock.share("heal")
    assert heal is not None and heal >= 85.0 / 3 - 10.0 and heal == pytest.approx(25.0)


def test_resume_without_a_limit_distils_again_what_a_limit_cut_short(tmp_path) -> None:
    """A run whose --time-limit cut a site's distillation short saves that student for
    --resume; resumed without a limit, the run distils every site again (the cut one to its full
    budget, the others from the cache) instead of shipping the cut student. Resumed under a
    limit again, the saved students stand (the ledger measured them)."""
    from types import SimpleNamespace

    import torch
    from rich.console import Console

    from dtr_compile.config import CompileConfig
    from dtr_compile.distill.stage import reuse_students
    from dtr_compile.search.ledger import save_students

    path = tmp_path / "h.report.students.pt"
    students = {"site0": torch.nn.Linear(4, 4), "site1": torch.nn.Linear(4, 4)}
    save_students(path, "fp", students,
                  {"site0": {"site_id": "site0", "ok": True, "init_error": 0.1,
                             "final_error": 0.05, "final_loss": 0.0, "steps": 400,
                             "seconds": 1.0},
                   "site1": {"site_id": "site1", "ok": True, "init_error": 0.1,
                             "final_error": 0.1, "final_loss": 0.0, "steps": 0, "seconds": 0.0,
                             "time_limited": True}})
    sites = [SimpleNamespace(id="site0"), SimpleNamespace(id="site1")]
    console = Console(record=True, width=200)

    def reuse(limit: str | None):  # noqa: ANN202
        config = CompileConfig(model="m.pt", output=str(tmp_path / "h.onnx"), resume=True,
                               time_limit=limit)
        return reuse_students(path, "fp", sites, config, console,
                              lambda sid: torch.nn.Linear(4, 4))

    assert reuse(None) is None
    assert "site1 were cut short" in console.export_text()
    got = reuse("10m")
    assert got is not None and got[1]["site1"].time_limited
