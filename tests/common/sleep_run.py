"""A stand-in binary for the main job's scheduling tests: records when it ran, in ``--workdir``."""

import json
import os
import sys
import time

if __name__ == "__main__":
  args = dict(a.removeprefix("--").split("=", 1) for a in sys.argv[1:])
  start = time.time()
  time.sleep(float(args.get("seconds", "1")))
  os.makedirs(args["workdir"], exist_ok=True)
  with open(os.path.join(args["workdir"], "ran.json"), "w") as f:
    json.dump({"start": start, "end": time.time()}, f)
