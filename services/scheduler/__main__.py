from wicore.cli import main

main(["scheduler"])
