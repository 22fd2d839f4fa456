from dtr_compile.cli import entry

entry()
