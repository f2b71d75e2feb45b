from clipsift.cli import main

main()
