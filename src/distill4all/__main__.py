from distill4all.cli import main

main()
