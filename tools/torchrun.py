"""torchrun with preemption's exit status: a stop signal to it (SIGTERM, SIGUSR1, SIGINT) reaches every rank,
rank 0 checkpoints and says so in one line, and it exits 75 (130 for Ctrl-C) without a traceback, as
train.py does in one process (torchrun itself exits 1 with a SignalException and passes no SIGUSR1 on).

    python -m tools.torchrun --nproc_per_node=8 train.py --resume=auto ...    # torchrun's own options
"""
import logging
import signal
import sys

import torch.distributed.elastic.agent.server.api  # noqa: F401 (the loggers set below)
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException


def main(argv):
    if argv[:1] in (['-h'], ['--help']):
        print(__doc__.strip() + '\n\ntorchrun\'s options follow.\n')
    # the signals torchrun passes on to the ranks; SIGUSR1 (SLURM's --signal=USR1@SECONDS) is not a default
    if not any(a.startswith(('--signals-to-handle', '--signals_to_handle')) for a in argv):
        argv = ['--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1'] + argv
    for name in ('agent.server.api', 'multiprocessing.api'):  # 'shutting down workers': rank 0's line says it
        logging.getLogger(f'torch.distributed.elastic.{name}').setLevel(logging.ERROR)
    try:
        torchrun.run(torchrun.parse_args(argv))
    except SignalException as e:
        return 130 if e.sigval == signal.SIGINT else 75
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
