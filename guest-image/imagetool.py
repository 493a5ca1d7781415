#!/usr/bin/env python3
"""Husk guest image tools, deterministic and without root.

  imagetool.py cpio SPEC OUT      write an uncompressed newc cpio archive from a gen_init_cpio-style
                                  spec (dir/file/nod/slink lines; see usr/gen_init_cpio.c in Linux)
  imagetool.py manifest DIR ...   write DIR/manifest.json (see `manifest --help`)

All entries get mtime 0 so that identical inputs give byte-identical archives.
"""
import argparse
import hashlib
import json
import os
import stat
import sys

NEWC_MAGIC = b"070701"


class SpecError(Exception):
    pass


def _pad4(n):
    return (4 - n % 4) % 4


class CpioWriter:
    def __init__(self, out):
        self.out = out
        self.ino = 721  # arbitrary start, like gen_init_cpio

    def _entry(self, name, mode, uid, gid, data=b"", nlink=1, rmajor=0, rminor=0):
        name_bytes = name.lstrip("/").encode() + b"\0"
        if name_bytes == b"\0":
            raise SpecError("empty path")
        fields = [self.ino, mode, uid, gid, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name_bytes), 0]
        self.ino += 1
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self.out.write(header + name_bytes + b"\0" * _pad4(len(header) + len(name_bytes)))
        self.out.write(data + b"\0" * _pad4(len(data)))

    def dir(self, name, mode, uid, gid):
        self._entry(name, stat.S_IFDIR | mode, uid, gid, nlink=2)

    def file(self, name, src, mode, uid, gid):
        with open(src, "rb") as f:
            self._entry(name, stat.S_IFREG | mode, uid, gid, f.read())

    def nod(self, name, mode, uid, gid, kind, major, minor):
        kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
        if kind not in kinds:
            raise SpecError(f"device type must be c or b, not {kind!r}")
        self._entry(name, kinds[kind] | mode, uid, gid, rmajor=major, rminor=minor)

    def slink(self, name, target, mode, uid, gid):
        self._entry(name, stat.S_IFLNK | mode, uid, gid, target.encode())

    def trailer(self):
        self.ino = 0
        self._entry("TRAILER!!!", 0, 0, 0, nlink=1)


def write_cpio(spec_path, out_path):
    tmp = out_path + ".tmp"
    with open(spec_path) as spec, open(tmp, "wb") as out:
        writer = CpioWriter(out)
        for lineno, line in enumerate(spec, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            try:
                kind, args = words[0], words[1:]
                if kind == "dir" and len(args) == 4:
                    writer.dir(args[0], int(args[1], 8), int(args[2]), int(args[3]))
                elif kind == "file" and len(args) == 5:
                    writer.file(args[0], args[1], int(args[2], 8), int(args[3]), int(args[4]))
                elif kind == "nod" and len(args) == 7:
                    writer.nod(args[0], int(args[1], 8), int(args[2]), int(args[3]), args[4], int(args[5]), int(args[6]))
                elif kind == "slink" and len(args) == 5:
                    writer.slink(args[0], args[1], int(args[2], 8), int(args[3]), int(args[4]))
                else:
                    raise SpecError(f"unknown entry or wrong number of fields: {line.strip()!r}")
            except (SpecError, ValueError, OSError) as err:
                sys.exit(f"imagetool: {spec_path}:{lineno}: {err}")
        writer.trailer()
    os.replace(tmp, out_path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(directory, name):
    path = os.path.join(directory, name)
    return {"path": name, "sha256": sha256_file(path), "size": os.path.getsize(path)}


def write_manifest(args):
    manifest = {
        "format": 1,
        "kernel": describe(args.dir, "vmlinux"),
        "initramfs": describe(args.dir, "initramfs.cpio"),
        "agent": {"version": args.agent_version, "api": args.agent_api, "sha256": sha256_file(args.agent)},
        "inputs": dict(kv.split("=", 1) for kv in args.input),
    }
    manifest["kernel"]["config_key"] = args.kernel_key
    tmp = os.path.join(args.dir, "manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, os.path.join(args.dir, "manifest.json"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cpio = sub.add_parser("cpio", help="write a newc cpio archive from a spec")
    cpio.add_argument("spec")
    cpio.add_argument("out")
    man = sub.add_parser("manifest", help="write manifest.json for a guest image directory")
    man.add_argument("dir")
    man.add_argument("--agent", required=True, help="the agent binary put into the initramfs")
    man.add_argument("--agent-version", required=True)
    man.add_argument("--agent-api", required=True, type=int)
    man.add_argument("--kernel-key", required=True)
    man.add_argument("--input", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    if args.command == "cpio":
        write_cpio(args.spec, args.out)
    else:
        write_manifest(args)


if __name__ == "__main__":
    main()
