"""A reader process: positional reads of checkpoint byte ranges straight into the shared read-ahead region.

Run by file path (`python -I _read_worker.py REGION_FD REGION_BYTES FILE_FD...`, see readers.py), never
imported with the package: it imports only os, sys, struct and mmap, so it starts in milliseconds and
never takes the loading process's GIL. stdin carries fixed-size jobs, stdout fixed-size replies:

    job   <QIQQQ  job id, file index (into FILE_FD...), file offset, bytes, region offset
    reply <QiQ    job id, errno (0: no error), bytes read (fewer than asked: the file ends there)

EOF on stdin: exit 0.
"""

import mmap
import os
import struct
import sys

JOB = struct.Struct("<QIQQQ")
REPLY = struct.Struct("<QiQ")


def main(argv: list[str]) -> int:
    region_fd, region_bytes = int(argv[1]), int(argv[2])
    files = [int(a) for a in argv[3:]]
    region = memoryview(mmap.mmap(region_fd, region_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
    os.close(region_fd)  # the mapping stays
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    batch = 64 * JOB.size
    pending = b""
    while True:
        got = os.read(stdin, batch)  # every job the parent has queued so far, up to 64
        if not got:
            return 0
        pending += got
        whole = len(pending) - len(pending) % JOB.size
        jobs, pending = pending[:whole], pending[whole:]
        for job, file, offset, nbytes, at in JOB.iter_unpack(jobs):
            view, done, err = region[at : at + nbytes], 0, 0
            while done < nbytes:
                try:
                    n = os.preadv(files[file], [view[done:]], offset + done)
                except OSError as e:
                    err = e.errno or -1
                    break
                if n == 0:
                    break
                done += n
            view.release()
            os.write(stdout, REPLY.pack(job, err, done))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except BrokenPipeError:  # the parent went away
        sys.exit(0)
