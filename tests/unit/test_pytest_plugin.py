"""The pytest plugin as a user's project meets it: the qemu marker on fixture tests, a skip with
the reason and the fixing command when the test guest is missing (a failure when QEMU is
required), and the settings as options, ini keys and environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

USER_TEST = """
def test_uses_a_guest(qemu_instance):
    qemu_instance.check("true")

def test_plain():
    pass
"""


@pytest.fixture
def empty_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A prefix without the test guest (and without QEMU 7.2)."""
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    for variable in ("FORGEQMP_PREFIX", "FORGEQMP_REQUIRE_QEMU", "FORGEQMP_QEMU"):
        monkeypatch.delenv(variable, raising=False)
    return prefix


def test_missing_guest_skips_with_the_command_that_fixes_it(
    pytester: pytest.Pytester, empty_prefix: Path
) -> None:
    pytester.makepyfile(USER_TEST)
    result = pytester.runpytest_subprocess(f"--forgeqmp-prefix={empty_prefix}", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    text = result.stdout.str()
    assert "-m forgeqmp.testing setup" in text
    assert "missing" in text


def test_required_qemu_fails_instead_of_skipping(
    pytester: pytest.Pytester, empty_prefix: Path
) -> None:
    pytester.makepyfile(USER_TEST)
    pytester.makeini(f"[pytest]\nforgeqmp_require_qemu = true\nforgeqmp_prefix = {empty_prefix}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    # The 7.2 build the set-up installs into the prefix is missing: the session itself fails.
    assert result.ret != 0
    assert "-m forgeqmp.testing setup" in result.stdout.str() + result.stderr.str()


def test_fixture_tests_get_the_qemu_marker(pytester: pytest.Pytester, empty_prefix: Path) -> None:
    pytester.makepyfile(USER_TEST)
    result = pytester.runpytest_subprocess(f"--forgeqmp-prefix={empty_prefix}", "-m", "not qemu")
    result.assert_outcomes(passed=1, deselected=1)


def test_the_setup_module_says_what_is_missing(
    empty_prefix: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from forgeqmp.testing import setup

    monkeypatch.setenv("FORGEQMP_PREFIX", str(empty_prefix))
    assert setup.main(["check"]) == 1
    out = capsys.readouterr().out
    assert f"missing: test guest ingredient {empty_prefix / 'guest' / 'vmlinuz'} is missing" in out
    assert "fix: " in out
    assert "-m forgeqmp.testing setup" in out
    assert setup.main(["frobnicate"]) == 2
    assert setup._script().is_file()  # shipped inside the package


NEWEST_ONLY_TEST = """
import pytest

@pytest.mark.qemu_newest
def test_whole(qemu_build):
    pass

@pytest.mark.parametrize("kind", ["every", pytest.param("one", marks=pytest.mark.qemu_newest)])
def test_params(qemu_build, kind):
    pass
"""


def test_qemu_newest_runs_on_the_newest_build_only(pytester: pytest.Pytester) -> None:
    from forgeqmp.testing.builds import installed_builds

    builds = [b.name for b in installed_builds()]
    if len(builds) < 2:
        pytest.skip(f"needs two installed QEMU builds to tell them apart (found {builds})")
    pytester.makepyfile(NEWEST_ONLY_TEST)
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    kept = [line.split("::", 1)[1] for line in result.stdout.lines if "::" in line]
    newest = builds[0]
    assert sorted(kept) == sorted(
        [f"test_whole[qemu-{newest}]", f"test_params[qemu-{newest}-one]"]
        + [f"test_params[qemu-{b}-every]" for b in builds]
    )
    # 3 generated per build (test_whole, test_params twice), minus those kept
    assert f"{3 * len(builds) - len(kept)} deselected" in result.stdout.str()
