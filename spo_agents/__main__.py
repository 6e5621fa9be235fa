import sys

from spo_agents.cli import main

sys.exit(main())
