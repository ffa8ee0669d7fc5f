"""The simulation behind the README's "On the demo" numbers: calibration sets
drawn with replacement from the demo's 2,000 test outcomes, certified as the
system runs (tests/fixtures/demo_population.py), violation frequencies.

  .venv/bin/python benchmarks/certificate_validity.py [draws] [n_cal]   # defaults 1000 1000
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from fixtures import demo_population as demo  # noqa: E402


def main():
  draws = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
  n_cal = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
  pop = demo.load()
  for eps, delta, test in ((0.02, 0.1, "wsr"), (0.02, 0.1, "hb"), (0.01, 0.2, "wsr")):
    t0 = time.perf_counter()
    got = demo.simulate(pop, draws, n_cal, eps, delta, test, seed=1)
    got.update(eps=eps, delta=delta, test=test, seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(got), flush=True)


if __name__ == "__main__":
  main()
