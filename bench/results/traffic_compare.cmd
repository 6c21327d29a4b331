fedsb compare --methods fed-sb,fedit --rank fed-sb=32,fedit=24 --validation-fraction 0 --num-supernodes 10 --out runs/traffic
