from xsbuild.cli import main

main()
