// c1: a one-connection, closed-loop HTTP/1.1 client that times every request itself
// (CLOCK_MONOTONIC) and prints p50/p90/p99/p99.9/max, without the coordinated-omission
// correction wrk applies (see docs/benchmarks.md, "Recording without a tail"): a stall of d
// delays one request here, while wrk adds d / (mean interval) synthetic samples for it.
// Reading both tells a rare long stall from many slow requests.
//
//   cc -O2 -o bench/out/c1 bench/c1.c
//   taskset -c 1 bench/out/c1 PORT SECONDS [SLOW_US]   # SLOW_US: print each slower request
//
// Sends the chat request of bench/post.lua to 127.0.0.1:PORT/v1/chat/completions with the
// bench token; expects 200 and a Content-Length response (JSON, not streams).
#define _GNU_SOURCE
// c=1 keep-alive HTTP client: per-request latency (CLOCK_MONOTONIC); prints percentiles and slow request timestamps
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e6+t.tv_nsec/1e3;}
static int cmp(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){int port=atoi(argv[1]);double dur=atof(argv[2])*1e6;double slow=argc>3?atof(argv[3]):1e9;
 const char*body="{\"model\":\"gpt-4o-mini\",\"temperature\":0.7,\"max_tokens\":256,\"messages\":[{\"role\":\"system\",\"content\":\"You are a helpful assistant. Answer briefly and precisely.\"},{\"role\":\"user\",\"content\":\"What is the capital of France, and what is it known for? Please answer in two sentences.\"}]}";
 char req[4096];int rl=snprintf(req,sizeof req,"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-bench-client-token\r\nUser-Agent: OpenAI/Python 1.54.0\r\nContent-Length: %zu\r\n\r\n%s",port,strlen(body),body);
 int s=socket(AF_INET,SOCK_STREAM,0);int one=1;setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);
 struct sockaddr_in a={0};a.sin_family=AF_INET;a.sin_port=htons(port);a.sin_addr.s_addr=htonl(0x7f000001);
 if(connect(s,(void*)&a,sizeof a)){perror("connect");return 1;}
 size_t cap=4000000;double*lat=malloc(cap*sizeof(double));size_t n=0;char buf[65536];double t0=now();
 while(now()-t0<dur&&n<cap){double st=now();if(write(s,req,rl)!=rl){perror("write");return 1;}
  size_t got=0;long need=-1;size_t hend=0;
  while(1){ssize_t r=read(s,buf+got,sizeof buf-got);if(r<=0){perror("read");return 1;}got+=r;
   if(!hend){char*e=memmem(buf,got,"\r\n\r\n",4);if(e){hend=e-buf+4;char*cl=memmem(buf,hend,"content-length:",15);if(!cl)cl=memmem(buf,hend,"Content-Length:",15);need=cl?atol(cl+15):0;}}
   if(hend&&got>=hend+need)break;}
  if(memcmp(buf+9,"200",3)){fprintf(stderr,"status %.3s\n",buf+9);return 1;}
  double l=now()-st;lat[n++]=l;if(l>slow)printf("SLOW %.6f %.0f\n",st/1e6,l);}
 double tot=0;for(size_t i=0;i<n;i++)tot+=lat[i];
 qsort(lat,n,sizeof(double),cmp);
 printf("N %zu mean %.1f p50 %.0f p90 %.0f p99 %.0f p99.9 %.0f max %.0f sum %.2fs\n",n,tot/n,lat[n/2],lat[n*9/10],lat[n*99/100],lat[n*999/1000],lat[n-1],tot/1e6);}
