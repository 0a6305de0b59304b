"""PyMoJo's wire, both eras, against a started opsbox (the README's "Coming from
Pyjojo" example among them)."""

import pytest
import requests

from pymojo_wire import MojoA, MojoB


def mojo_for(server, cls=MojoB, **kwargs):
    return cls(endpoint="127.0.0.1", port=server.port, use_ssl=server.url.startswith("https"), **kwargs)


def test_readme_example_over_tls_with_auth(make_opsbox):
    server = make_opsbox(tls=True, htpasswd="username:{SHA}ByJDXwIUdYkkuNXVNN6m4jkSKF0=\n")
    # {SHA} of "A good password"
    mojo = mojo_for(server, verify=False, user="username", password="A good password")
    assert mojo.get_script("echo")["name"] == "echo"
    fresh = mojo.get_script("echo", use_cache=False)
    assert fresh["http_method"] == "post"
    assert fresh["params"] == [{"name": "text", "description": "text to echo"}]
    resp = mojo.run("echo", params={"text": "hi"})
    assert resp.status_code == 200
    assert resp.json() == {"retcode": 0, "stdout": ["echo'd text: hi"], "stderr": [], "return_values": {}}
    assert resp.headers["Content-Type"] == "application/json; charset=UTF-8"
    assert mojo.reload() is True


def test_wrong_password_raises_from_the_constructor(make_opsbox):
    server = make_opsbox(htpasswd="username:$apr1$RandSalt$PgCXHRrkpSt4cbyC2C6bm/\n")  # "password"
    with pytest.raises(requests.HTTPError):
        mojo_for(server, user="username", password="wrong")
    with pytest.raises(requests.HTTPError):
        mojo_for(server)
    mojo = mojo_for(server, user="username", password="password")
    assert mojo.unauthorized is False
    assert "echo" in mojo.scripts
    # Era A clients never raise: they get an empty cache.
    assert MojoA(endpoint="127.0.0.1", port=server.port, user="username", password="nope").scripts == {}


def test_every_htpasswd_format_and_colon_passwords(make_opsbox):
    server = make_opsbox(
        htpasswd="b:$2y$05$bvIG6Nmid91Mu9RcmmWZfO5HJIMCT8riNW0hEp8f6/FuA2/mHZFpe\n"  # htpasswd -B, "password"
        "d:aZGJuE6EXrjEE\n"  # htpasswd -d (DES crypt), "test"
        "m:$apr1$RandSalt$PgCXHRrkpSt4cbyC2C6bm/\n"  # htpasswd -m, "password"
        "s:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"  # htpasswd -s, "password"
        "c:pass:with:colons\n"  # plaintext, with colons in the password
    )
    for user, password in [("b", "password"), ("d", "test"), ("m", "password"), ("s", "password"), ("c", "pass:with:colons")]:
        mojo = mojo_for(server, user=user, password=password)
        assert mojo.run("echo", params={"text": user}).json()["stdout"] == [f"echo'd text: {user}"]
        with pytest.raises(requests.HTTPError):
            mojo_for(server, user=user, password=password + "x")


def test_fresh_client_runs_every_script_with_post(opsbox):
    mojo = mojo_for(opsbox)
    assert all(s["http_method"] == "POST" for s in mojo.scripts.values())
    # A GET, a PUT and a DELETE script all run with POST on a fresh client (decision D2).
    assert mojo.run("date").json()["return_values"]["year"].isdigit()
    assert mojo.run("update").json()["retcode"] == 4
    assert mojo.run("remove", params={"name": "x"}).json()["stdout"] == ["removed x"]


def test_refreshed_client_uses_the_declared_methods(opsbox):
    mojo = mojo_for(opsbox)
    assert mojo.reload() is True
    assert mojo.get_script("date")["http_method"] == "get"
    date = mojo.run("date", params={})  # a GET with a JSON body
    assert date.status_code == 200 and date.json()["retcode"] == 0
    mojo.get_script("update", use_cache=False)
    assert mojo.run("update").status_code == 200
    remove = mojo.run("remove", params={"name": "it's here"})
    assert remove.json()["stdout"] == ["removed it's here"]


def test_combined_output_and_return_values(opsbox):
    mojo = mojo_for(opsbox)
    result = mojo.run("math", params={"a": "2", "b": 7}).json()
    assert result == {
        "retcode": 0,
        "stdout": ["2 + 7 = 9", "warning: nothing", "jojo_return_value sum=9"],
        "return_values": {"sum": "9"},
    }


def test_unknown_scripts_and_params(opsbox):
    mojo = mojo_for(opsbox)
    assert mojo.get_script("nope") is None
    assert mojo.get_script("nope", use_cache=False) is None
    with pytest.raises(KeyError):
        mojo.run("nope")
    # Undeclared params are ignored; a declared one left out is the empty string.
    assert mojo.run("echo", params={"other": 1}).json()["stdout"] == ["echo'd text: "]
    assert mojo.run("echo").json()["stdout"] == ["echo'd text: "]


def test_missing_required_param_is_a_400(opsbox):
    mojo = mojo_for(opsbox)
    refused = mojo.run("greet", params={})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == 400
    assert "missing required param 'name'" in refused.json()["error"]["message"]
    assert mojo.run("greet", params={"name": "ada"}).json()["stdout"] == ["hello, ada"]


def test_tag_filters_and_names(opsbox):
    mojo = mojo_for(opsbox)
    assert sorted(mojo.get_scripts("tags", "math")) == ["math", "update"]
    assert sorted(mojo.get_scripts("tags", "math,write")) == ["update"]
    assert sorted(mojo.get_script_names("any_tags", "time,write")) == ["date", "update"]
    assert "math" not in mojo.get_script_names("not_tags", "math")
    assert sorted(mojo.get_script_names()) == ["date", "echo", "greet", "math", "remove", "update"]


def test_era_a_client(opsbox):
    mojo = mojo_for(opsbox, cls=MojoA)
    assert mojo.get_script("echo")["description"] == "echo's text"
    with pytest.raises(KeyError):
        mojo.get_script("nope")
    # Details by GET for a script that is not a GET script (decision D3).
    assert mojo.get_script("echo", use_cache=False)["name"] == "echo"
    result = mojo.run("echo", params={"text": "hello world!"}).json()
    assert result["stdout"] == ["echo'd text: hello world!"]
    assert mojo.run("update").json()["retcode"] == 4
    mojo.reload()
    assert "date" in mojo.scripts


def test_runs_are_opsbox_jobs(opsbox):
    mojo = mojo_for(opsbox)
    mojo.run("echo", params={"text": "tracked"})
    jobs = requests.get(opsbox.url + "/v1/jobs?script=echo").json()["jobs"]
    assert len(jobs) == 1 and jobs[0]["state"] == "succeeded"
    log = requests.get(opsbox.url + "/v1/jobs/" + requests.utils.quote(jobs[0]["name"], safe="") + "/log").json()
    assert log["stdout"] == ["echo'd text: tracked"]
