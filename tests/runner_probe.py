# %% [markdown]
# # Runner probe
#
# A tiny template for the runner's tests: records where and as whom it ran, writes a file
# into its run folder, and fails on request.

# %% tags=["parameters"]
message = "hello"
count = 2
ratio = 0.5
flag = False
names = ["a", "b"]
dataset = ""
fail = False

# %%
import json, os, socket
from pathlib import Path

run_dir = Path(os.environ.get("MEDZONE_RUN_DIR", "."))
probe = {
    "uid": os.getuid(),
    "interfaces": sorted(name for _, name in socket.if_nameindex()),
    "cwd": os.getcwd(),
    "run_dir": str(run_dir),
    "home": os.environ.get("HOME"),
    "data": sorted(os.listdir("/data")) if os.path.isdir("/data") else None,
    "params": {"message": message, "count": count, "ratio": ratio, "flag": flag,
               "names": names, "dataset": dataset},
    "types": [type(v).__name__ for v in (message, count, ratio, flag, names)],
}
Path("probe.json").write_text(json.dumps(probe))
print(probe)

# %%
if fail:
    raise RuntimeError("probe failure requested")

# %%
Path("after.txt").write_text("reached the end")
