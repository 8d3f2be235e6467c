from qloader.cli import main

main()
