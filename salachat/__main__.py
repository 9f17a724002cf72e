from salachat.cli import main

main()
