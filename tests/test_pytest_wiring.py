"""The pytest wiring, exercised by running pytest on small suites in a scratch folder.

Each case runs a real pytest subprocess with the rig's plugins (as ``conftest.py`` loads
them), so what is asserted is what a lab engineer sees: test ids, exit codes, messages.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()  # the repo's own plugin list

LAB = """\
lab: scratch
wifi:
  - ssid: scratch-ap
    passphrase: "scratch-passphrase-42"
boards:
  - name: vb1
    kind: virtual
  - name: vb2
    kind: virtual
    efuse: {sacrificial: false}
"""


@pytest.fixture
def scratch(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".yaml", boards=LAB)
    pytester.makeconftest(CONFTEST)
    return pytester


def run(p: pytest.Pytester, suite: str, *args: str) -> pytest.RunResult:
    p.makepyfile(test_suite=textwrap.dedent(suite))
    return p.runpytest_subprocess(f"--boards={p.path / 'boards.yaml'}", f"--rig-run-dir={p.path / 'run'}", *args)


def test_each_board_test_runs_once_per_board_with_board_id(scratch: pytest.Pytester) -> None:
    result = run(
        scratch,
        """
        import pytest
        @pytest.mark.parametrize("n", [1, 2])
        def test_one(board, n):
            assert board.kind == "virtual" and board.chip == "esp32c3"
        def test_plain():
            pass
        """,
        "-v",
    )
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*test_one?1-vb1? PASSED*", "*test_one?1-vb2? PASSED*", "*test_one?2-vb2? PASSED*", "*test_plain PASSED*"])


def test_board_option_selects(scratch: pytest.Pytester) -> None:
    result = run(scratch, "def test_one(board):\n    assert board.name == 'vb2'\n", "--board=vb2", "-v")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_one?vb2? PASSED*"])


def test_unknown_board_is_a_usage_error(scratch: pytest.Pytester) -> None:
    result = run(scratch, "def test_one(board):\n    pass\n", "--board=vb7")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no board named 'vb7'. Fix: use one of vb1, vb2*"])
    assert "Traceback" not in result.stderr.str()


def test_invalid_boards_yaml_is_a_usage_error_without_traceback(scratch: pytest.Pytester) -> None:
    scratch.makefile(".yaml", boards="lab: x\nboards:\n  - name: a\n    kind: esp\n")
    result = run(scratch, "def test_one(board):\n    pass\n")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*boards.yaml:3: boards[[]0[]] (a): board 'a' is a real board (kind: esp) without a port*"])
    assert "Traceback" not in result.stderr.str()


def test_unknown_etsi_provision_is_a_collection_error(scratch: pytest.Pytester) -> None:
    result = run(scratch, "import pytest\n@pytest.mark.etsi('5.5-1', '5.5.2')\ndef test_one(board):\n    pass\n")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting*", "*'5.5.2', not an EN 303 645 provision*"])


def test_known_etsi_and_needs_collect(scratch: pytest.Pytester) -> None:
    suite = "import pytest\n@pytest.mark.etsi('5.5-1', '5.13-1B')\n@pytest.mark.needs('wifi')\ndef test_one(board):\n    pass\n"
    run(scratch, suite).assert_outcomes(passed=2)


def test_unknown_feature_is_a_collection_error(scratch: pytest.Pytester) -> None:
    result = run(scratch, "import pytest\n@pytest.mark.needs('zigbee')\ndef test_one(board):\n    pass\n")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*needs('zigbee') names no known feature. Fix: use one of ble,*"])


def test_destructive_runs_only_on_sacrificial_boards(scratch: pytest.Pytester) -> None:
    result = run(scratch, "import pytest\n@pytest.mark.destructive\ndef test_burn(board):\n    pass\n", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*NOT_APPLICABLE: test burns eFuses and board 'vb2' is not sacrificial*"])


def test_dut_without_board_is_a_collection_error(scratch: pytest.Pytester) -> None:
    result = run(scratch, "def test_console(dut):\n    pass\n")
    result.stdout.fnmatch_lines(["*uses dut without board. Fix: also request the board fixture*"])


def test_virtual_board_port_comes_from_its_published_url(scratch: pytest.Pytester) -> None:
    state = scratch.path / ".rig" / "boards" / "vb1"
    state.mkdir(parents=True)
    (state / "port").write_text("rfc2217://127.0.0.1:45123\n")
    suite = """
        def test_ports(board, port, target, app_path, build_dir):
            if board.name == "vb1":
                assert port == "rfc2217://127.0.0.1:45123"
            assert target == "esp32c3"
            assert app_path == build_dir and app_path.endswith(".rig/firmware/virtual/base")
        """
    result = run(scratch, suite, "--board=vb1")
    result.assert_outcomes(passed=1)


def test_board_without_port_fails_with_fix(scratch: pytest.Pytester) -> None:
    run(scratch, "def test_ports(board, port):\n    assert port is None\n", "--board=vb2").assert_outcomes(passed=1)
    result = run(scratch, "def test_console(board, dut):\n    pass\n", "--board=vb2", "--no-start-boards")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*board 'vb2' has no serial port yet. Fix: start it with `rig vboard serve vb2` or `rig up`*"])


def test_board_log_is_written_and_redacted(scratch: pytest.Pytester) -> None:
    suite = "def test_log(board):\n    board.log.info('joining with scratch-passphrase-42 now')\n"
    run(scratch, suite, "--board=vb1").assert_outcomes(passed=1)
    text = (scratch.path / "run" / "logs" / "vb1.log").read_text()
    assert "joining with *** now" in text and "scratch-passphrase-42" not in text


def test_plain_tests_do_not_need_a_lab(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_unit="def test_x(tmp_path):\n    assert tmp_path.exists()\n")
    result = pytester.runpytest_subprocess("--boards=/nonexistent/boards.yaml")
    result.assert_outcomes(passed=1)


def test_missing_port_message_from_esptool(scratch: pytest.Pytester, tmp_path: Path) -> None:
    """A real-board port that does not exist: one readable error, no traceback in the reason."""
    scratch.makefile(".yaml", boards="lab: x\nboards:\n  - name: bench\n    kind: esp\n    port: /dev/rig-no-such-port\n")
    result = run(scratch, "def test_mac(board):\n    board.read_mac()\n", "--tb=line")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*BoardError: board 'bench' on /dev/rig-no-such-port:*Could not open /dev/rig-no-such-port*"])


def test_real_board_identity_is_checked_once_before_use(scratch: pytest.Pytester) -> None:
    """A declared MAC is checked with esptool before first use; an unreachable board makes the
    tests INCONCLUSIVE (errors at setup, esptool asked once), not failures of the device."""
    lab = "lab: x\nboards:\n  - name: bench\n    kind: esp\n    port: /dev/rig-no-such-port\n    mac: 84:f7:03:00:00:01\n"
    scratch.makefile(".yaml", boards=lab)
    result = run(scratch, "def test_a(board):\n    pass\ndef test_b(board):\n    pass\n")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*INCONCLUSIVE: board 'bench' on /dev/rig-no-such-port:*Could not open*"])
    log = (scratch.path / "run" / "logs" / "bench.log").read_text()
    assert sum("INFO esptool" in line and "read-mac" in line for line in log.splitlines()) == 1


def test_cloud_fixture_starts_the_local_stack_for_the_session(scratch: pytest.Pytester) -> None:
    suite = """
        def test_api(cloud):
            with cloud.client() as c:
                assert "v1" in c.get("/apiversions").json()["supported_versions"]
            email, password = cloud.add_user()
            with cloud.client() as c:
                r = c.post("/v1/login2", json={"user_name": email, "password": password})
                assert r.status_code == 200 and r.json()["accesstoken"]
            before = cloud.advance_clock(0)
            assert cloud.advance_clock(3600) >= before + 3600
        def test_same_stack(cloud):
            assert cloud.local and cloud.endpoints.test_mode
        """
    result = run(scratch, suite)
    result.assert_outcomes(passed=2)
    assert (scratch.path / "run" / "logs" / "cloud").is_dir()


def test_virtual_board_is_started_when_a_test_needs_its_port(scratch: pytest.Pytester) -> None:
    suite = """
        def test_mac(board):
            assert board.port is None  # nothing started before it is needed
            assert board.read_mac().startswith("60:55:f9:")
            assert board.port.startswith("rfc2217://127.0.0.1:")
        """
    result = run(scratch, suite, "--board=vb1")
    result.assert_outcomes(passed=1)
    assert "rfc2217://" in (scratch.path / "run" / "logs" / "vb1.log").read_text()
    assert not (scratch.path / ".rig" / "boards" / "vb1" / "port").exists()  # stopped at session end


def test_run_folder_is_scrubbed_of_secrets_the_session_learnt(scratch: pytest.Pytester) -> None:
    """A PoP read from a console (registered mid-test) and the lab passphrase never reach the
    run folder, although JUnit and allure-pytest save the captured output that holds them."""
    run_dir = scratch.path / "run"
    result = run(
        scratch,
        """
        from rig.evidence.redaction import SECRETS

        def test_console_prints_secrets():
            SECRETS.add("5c26d7b0")  # as fixtures.node.read_qr does with a QR payload's PoP
            print('QRCODE: {"pop":"5c26d7b0"} Password : scratch-passphrase-42')
            assert False, "fail, so JUnit keeps the captured output"
        """,
        f"--junitxml={run_dir / 'junit.xml'}",
        f"--alluredir={run_dir / 'allure-results'}",
    )
    result.assert_outcomes(failed=1)
    texts = [p.read_text() for p in run_dir.rglob("*") if p.is_file()]
    assert any("QRCODE" in t for t in texts), "the captured output should be in the run folder (else this proves nothing)"
    assert not any("5c26d7b0" in t or "scratch-passphrase-42" in t for t in texts)
