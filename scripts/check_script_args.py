#!/usr/bin/env python3
"""Checks that a Python benchmark script accepts a command line, without running it.

    python3 scripts/check_script_args.py SCRIPT [ARG...]

Runs SCRIPT as `__main__` with ARG... as its argv and stops right after its first
`argparse.ArgumentParser.parse_args` returns: exit 0 and one JSON line with the parsed
arguments, or argparse's own usage error (exit 2). `scripts/gpu-check.sh --dry-run` uses it
to validate the PyTorch commands it will run on the GPU machine.

Where torch (or diffusers, transformers, numpy, safetensors) is not installed, as in CI, a
stand-in module that accepts any attribute, call or subclassing takes its place, so only the
argument parsing is checked; with the real packages installed they are imported as they are.
"""

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import runpy
import sys
import types

HEAVY = ("torch", "diffusers", "transformers", "numpy", "safetensors", "accelerate")


class _Anything:
    """Stands in for any attribute of a missing package: callable, subscriptable, iterable
    (empty), usable as a decorator and as a base class."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Anything()

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getitem__(self, key):
        return _Anything()

    def __iter__(self):
        return iter(())

    def __mro_entries__(self, bases):
        return ()


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Anything()


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, missing):
        self.missing = missing

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.missing:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _Parsed(Exception):
    pass


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: check_script_args.py SCRIPT [ARG...]")
    script, args = sys.argv[1], sys.argv[2:]
    missing = {name for name in HEAVY if importlib.util.find_spec(name) is None}
    if missing:
        sys.meta_path.insert(0, _StandInFinder(missing))

    parsed = {}
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        parsed.update(vars(original(self, args, namespace)))
        raise _Parsed()

    argparse.ArgumentParser.parse_args = parse_and_stop
    sys.argv = [script] + args
    sys.dont_write_bytecode = True
    try:
        runpy.run_path(script, run_name="__main__")
    except _Parsed:
        print(json.dumps({"script": script, "argv": args, "parsed": parsed, "stand_ins": sorted(missing)}, default=str))
        return
    sys.exit(f"{script}: ran to the end without calling ArgumentParser.parse_args")


if __name__ == "__main__":
    main()
