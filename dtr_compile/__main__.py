from dtr_compile.cli import main

main()
