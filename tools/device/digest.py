# sha256 over every tensor of an HF directory (sorted names, float32 bytes), read with the project's own
# loader: the teacher must be the same on both machines.
import hashlib
import sys
from pathlib import Path

import numpy as np

from bitbasis import hf

sd = hf.load_state_dict(Path(sys.argv[1]))
h = hashlib.sha256()
for k in sorted(sd):
    h.update(k.encode())
    h.update(np.ascontiguousarray(sd[k], dtype=np.float32).tobytes())
print("digest", h.hexdigest()[:16])
