"""Logins of the team's servers come from the environment only (docs/auth.md). The servers
behind authentication, the refusals of a wrong login and the logins' absence from every
record are tested for real in tests/test_integration.py; here, what needs no server."""

import pytest

from flows.cli import main
from tasks.tracking import login_headers


@pytest.mark.parametrize(
    "uri, where",
    [
        ("http://imf:s3cret-pw@127.0.0.1:9", "tracking.uri"),
        ("postgresql://mlflow:s3cret-pw@127.0.0.1:9/mlflow", "MLFLOW_TRACKING_URI"),
    ],
)
def test_a_password_in_the_tracking_uri_is_refused_unprinted(
    uri, where, capsys, tmp_path, monkeypatch
):
    """It would be recorded (the config is a run's params) and printed: refused before any
    work, without echoing it."""
    monkeypatch.chdir(tmp_path)
    argv = ["run", "-e", "smoke"]
    if where == "tracking.uri":
        argv.append(f"tracking.uri={uri}")
    else:
        monkeypatch.setenv(where, uri)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "imf run: error: tracking.uri (or MLFLOW_TRACKING_URI) holds a password, which would "
        "be recorded with every run: remove it and set MLFLOW_TRACKING_USERNAME/"
        "MLFLOW_TRACKING_PASSWORD (for a database URI, its driver's variable, e.g. PGPASSWORD)"
    ]
    assert "s3cret-pw" not in captured.out + captured.err
    assert not (tmp_path / "artifacts").exists()


def test_the_login_header_is_the_one_mlflows_client_sends(monkeypatch):
    """Basic with a user and a password, else the bearer token, else none."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert login_headers() == {}
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    assert login_headers() == {"Authorization": "Bearer t0ken"}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "imf")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    assert login_headers() == {"Authorization": "Basic aW1mOnB3"}  # base64 of "imf:pw"
