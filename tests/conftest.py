"""Suite-wide settings. One intra-op thread per test process: the suite runs on 2 shared cores,
where oversubscribed torch threads cost far more than they give (Ray workers are unaffected)."""

import torch

#: The S3 endpoint fixtures (s3_server, s3_prefix): a real S3 server on 127.0.0.1.
pytest_plugins = ["tests.s3server"]

torch.set_num_threads(1)
