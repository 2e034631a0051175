from retinaedge.cli import main

main()
