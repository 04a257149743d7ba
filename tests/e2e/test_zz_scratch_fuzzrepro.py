import asyncio, os, sys, time, json
from pathlib import Path
ST = str(Path(sys.executable).parent / "st")
async def run(platform, tmp, *args):
    cfg = tmp / "schemathesis.toml"; cfg.write_text("[cache]\nenabled = false\n")
    t = time.monotonic()
    p = await asyncio.create_subprocess_exec(ST, "--config-file", str(cfg), "run", platform.url + "/openapi.json",
        "--checks", "not_a_server_error", "--no-color", "--warnings", "off", "--continue-on-failure", "--no-shrink",
        "--request-timeout", "10", *args, cwd=str(tmp), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await p.communicate()
    return time.monotonic() - t, p.returncode, out.decode()

async def test_explore(platform, tenant, tmp_path):
    spec = json.loads(os.environ.get("EXPLORE", "[]"))
    for args in spec:
        args = [a.replace("OWNER", tenant.owner_key) for a in args]
        dt, rc, out = await run(platform, tmp_path, *args)
        tail = [l for l in out.splitlines() if "generated" in l or "(in " in l]
        print("\n### ", args[:12], f"{dt:.1f}s rc={rc}", tail, flush=True)
        if rc:
            Path(f"/tmp/fuzz/out_{int(time.time())}.txt").write_text(out)
            print(out[-6000:])
