# sha256 over every tensor of an HF directory (sorted names, float32 bytes): the teacher must be the same on both machines.
import sys, hashlib
from safetensors.numpy import load_file
import glob, numpy as np
h = hashlib.sha256()
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    sd = load_file(f)
    for k in sorted(sd):
        h.update(k.encode()); h.update(np.ascontiguousarray(sd[k].astype(np.float32)).tobytes())
print("digest", h.hexdigest()[:16])
