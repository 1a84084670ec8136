import sys

from fastlm.train import main

sys.exit(main())
