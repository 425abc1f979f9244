from ldit_client.cli import main

main()
