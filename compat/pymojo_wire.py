"""What PyMoJo does on the wire, call for call, as `shared/protocols/jojo.md` §10 records
it for both client eras. PyMoJo is not on the package index, so the compat tests drive
this stand-in, which sends exactly the requests the real client sends (a fresh session
per call, `Content-Type: application/json` on every request, pre-emptive Basic auth,
`Content-Length: 0` on bodiless POST/PUT/DELETE/OPTIONS, none on bodiless GET) and
reacts to the answers the way the client does."""

import base64
import json

import requests


def _call(mojo, path, method="GET", data=None):
    session = requests.Session()  # the client opens a new connection for every call
    headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
    if mojo.user is not None and mojo.password is not None:
        token = base64.b64encode(f"{mojo.user}:{mojo.password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = requests.Request(method, mojo.endpoint + path, data=data, headers=headers).prepare()
    # requests drops the Accept header only if we do; PyMoJo sends none.
    request.headers.pop("Accept", None)
    response = session.send(request, verify=mojo.verify)
    session.close()
    return response


class MojoB:
    """PyMoJo 0.8.4 to 0.9.3 (era B)."""

    def __init__(self, endpoint="localhost", port=3000, use_ssl=False, verify=True, user=None, password=None):
        scheme = "https" if use_ssl else "http"
        self.endpoint = f"{scheme}://{endpoint}:{port}"
        self.verify, self.user, self.password = verify, user, password
        self.unauthorized = False
        self.scripts = self.get_scripts()
        # The client's "old server" check tests the name string, so it always fires:
        # every cached script is run with POST until refreshed.
        for name in self.scripts:
            if "http_method" not in name:
                self.scripts[name]["http_method"] = "POST"

    def get_scripts(self, param=None, tags=None):
        route = "/scripts"
        if param is not None and tags is not None:
            route += f"?{param}={tags}"
        response = _call(self, route)
        if response.status_code == 200:
            return response.json()["scripts"]
        if response.status_code == 401:
            self.unauthorized = True
            response.raise_for_status()
        return {}

    def get_script_names(self, param=None, tags=None):
        route = "/script_names"
        if param is not None and tags is not None:
            route += f"?{param}={tags}"
        response = _call(self, route)
        if response.status_code == 200:
            return response.json()["script_names"]
        return None

    def reload(self):
        response = _call(self, "/reload", "POST")
        if response.status_code == 200:
            self.scripts = self.get_scripts()
            return True
        if response.status_code == 401:
            return False
        return None

    def get_script(self, name, use_cache=True):
        if use_cache:
            return self.scripts.get(name)
        response = _call(self, f"/scripts/{name}", "OPTIONS")
        if response.status_code == 200:
            self.scripts[name] = response.json()["script"]
            return self.scripts[name]
        return None

    def run(self, name, params=None):
        if name not in self.scripts:
            self.get_script(name, use_cache=False)
        data = json.dumps(params) if params is not None else None
        return _call(self, f"/scripts/{name}", self.scripts[name]["http_method"].upper(), data)


class MojoA:
    """PyMoJo 0.3 to 0.5.3 (era A): details by GET, runs always by POST."""

    def __init__(self, endpoint="localhost", port=3000, use_ssl=False, verify=True, user=None, password=None):
        scheme = "https" if use_ssl else "http"
        self.endpoint = f"{scheme}://{endpoint}:{port}"
        self.verify, self.user, self.password = verify, user, password
        response = _call(self, "/scripts")
        self.scripts = response.json()["scripts"] if response.status_code == 200 else {}

    def get_script(self, name, use_cache=True):
        if use_cache:
            return self.scripts[name]  # KeyError for unknown names, as the client does
        response = _call(self, f"/scripts/{name}")
        if response.status_code == 200:
            self.scripts[name] = response.json()["script"]
            return self.scripts[name]
        return None

    def run(self, name, params=None):
        data = json.dumps(params) if params is not None else None
        return _call(self, f"/scripts/{name}", "POST", data)

    def reload(self):
        _call(self, "/reload", "POST")
        response = _call(self, "/scripts")
        self.scripts = response.json()["scripts"] if response.status_code == 200 else None
