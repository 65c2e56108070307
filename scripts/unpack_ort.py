"""Copies libonnxruntime.so.<version> out of the onnxruntime wheel in WHEEL_DIR to LIB (atomically).

    python3 scripts/unpack_ort.py WHEEL_DIR LIB
"""
import glob
import os
import sys
import zipfile

wheel = glob.glob(os.path.join(sys.argv[1], "onnxruntime-*.whl"))[0]
want = os.path.basename(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("capi/" + want))
    part = sys.argv[2] + ".part"
    with z.open(name) as src, open(part, "wb") as dst:
        dst.write(src.read())
    os.chmod(part, 0o755)
    os.replace(part, sys.argv[2])
