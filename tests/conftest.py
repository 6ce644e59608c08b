"""Suite-wide settings. One intra-op thread per test process: the suite runs on 2 shared cores,
where oversubscribed torch threads cost far more than they give (Ray workers are unaffected)."""

import torch

torch.set_num_threads(1)
