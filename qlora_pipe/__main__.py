"""`python -m qlora_pipe`: the command line, also as launchers start it (`torchrun -m qlora_pipe train RECIPE`,
`accelerate launch -m qlora_pipe train RECIPE`)."""

import sys

from qlora_pipe.cli import main

sys.exit(main())
