from worker.launcher import main

main()
