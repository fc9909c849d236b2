from wicore.cli import main

main(["gateway"])
