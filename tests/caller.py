"""A conmon-like caller for the tests: a child subreaper that runs gvmrt commands and reaps orphans.

`gvmrt create` exits while the container init lives on; the kernel re-parents the init to the
nearest child subreaper among its ancestors (prctl(2) PR_SET_CHILD_SUBREAPER), which is how podman's
conmon and containerd's shim wait for it. This process plays that role: it reads one JSON request
per line on stdin ({"argv", "env", "stdin", "timeout", "background"}), runs it, replies with one
JSON line, and reaps exited orphans between requests. It is passed to the interpreter with -c, so
it works for a user who cannot read the checkout.
"""
import ctypes
import json
import os
import subprocess
import sys
import tempfile

libc = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER = 36
libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
background = {}
exited = {}


def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        exited[pid] = os.waitstatus_to_exitcode(status)


def files():
    # Files, not pipes: the container init inherits create's stdout/stderr and keeps them open,
    # so waiting for EOF on a pipe would wait for the container to exit.
    return tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")


def read(f):
    f.seek(0)
    return f.read()


for line in sys.stdin:
    req = json.loads(line)
    op = req.get("op", "run")
    if op == "run":
        out, err = files()
        try:
            res = subprocess.run(req["argv"], env=req["env"], input=req.get("stdin", ""), stdout=out, stderr=err,
                                 text=True, timeout=req.get("timeout", 60), cwd=req.get("cwd"))
            reply = {"rc": res.returncode, "stdout": read(out), "stderr": read(err)}
        except subprocess.TimeoutExpired as exc:
            reply = {"rc": None, "stdout": read(out), "stderr": f"timeout: {exc}\n{read(err)}"}
        out.close()
        err.close()
    elif op == "spawn":  # start in the background, answer at once with the pid
        out, err = files()
        p = subprocess.Popen(req["argv"], env=req["env"], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             text=True, cwd=req.get("cwd"))
        background[p.pid] = (p, out, err)
        reply = {"pid": p.pid}
    elif op == "wait":  # wait for a spawned command
        p, out, err = background.pop(req["pid"])
        try:
            p.wait(timeout=req.get("timeout", 60))
            reply = {"rc": p.returncode, "stdout": read(out), "stderr": read(err)}
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            reply = {"rc": None, "stdout": read(out), "stderr": "timeout\n" + read(err)}
        out.close()
        err.close()
    elif op == "reap":
        reply = {}
    else:
        reply = {"error": f"unknown op {op}"}
    if not background:
        reap()
    reply["exited"] = exited.copy()
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
