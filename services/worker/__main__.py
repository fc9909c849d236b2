from wicore.cli import main

main(["worker"])
