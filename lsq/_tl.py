import os, time
def tl(label):
    p = os.environ.get("LSQ_TL")
    if p:
        with open(p, "a") as f:
            f.write(f"{time.time():.3f} {os.getpid()} {label}\n")
