"""``python -m tf_lipschitz``: the ``tf-lipschitz`` command line (see :mod:`tf_lipschitz.cli`)."""

import sys

from tf_lipschitz.cli import main

if __name__ == "__main__":
    sys.exit(main())
