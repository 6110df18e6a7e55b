from buildfuzz.cli import main

main()
