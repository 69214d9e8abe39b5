import os, socket, sys, time, select
mode = sys.argv[1]  # block | spin
a, b = socket.socketpair()
pid = os.fork()
if pid == 0:
    os.sched_setaffinity(0, {0})
    b.setblocking(False)
    a.close()
    n = 0
    while True:
        if mode == "block":
            select.select([b], [], [])
        try:
            d = b.recv(65536)
            if not d: break
            n += len(d)
        except BlockingIOError:
            pass
    os._exit(0)
os.sched_setaffinity(0, {1})
b.close()
msg = b"x" * 200
ts = []
for i in range(3000):
    t0 = time.perf_counter_ns(); a.send(msg); ts.append(time.perf_counter_ns() - t0)
    t1 = time.perf_counter() + 0.0005
    while time.perf_counter() < t1: pass
a.close(); os.waitpid(pid, 0)
ts.sort(); print(mode, "send median us", ts[len(ts)//2]/1e3, "p90", ts[int(len(ts)*.9)]/1e3, "mean", sum(ts)/len(ts)/1e3)
